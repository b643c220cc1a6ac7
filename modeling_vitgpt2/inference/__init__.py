"""Trained models ready to caption: the one loader (folder, Hub id or adapter), prepacking and int8 on the CPU."""
