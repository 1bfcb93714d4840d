"""The engine core: scheduler and the step loop around the model runner."""
