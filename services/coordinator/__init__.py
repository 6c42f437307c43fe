"""The coordinator: runs module migrations between live workers as traced state machines."""
