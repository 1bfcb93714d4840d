"""The model runner: persistent request state, device-side inputs, forward, sampling."""
