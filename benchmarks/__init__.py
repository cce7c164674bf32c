"""Side-by-side benchmarks of peft_lightning: `python -m benchmarks.run NAME [--quick]`."""
