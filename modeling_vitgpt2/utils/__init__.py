"""Small helpers every layer may use: atomic writes, JSON reading with file-and-field errors."""
