"""Interoperability with other libraries' weights and adapters (diffusers, peft); optional extras."""
