"""What people run: the PEFT study, the demo page and Hub publishing (card, push, Space)."""
