"""Training library: state, schedules, data-parallel steps, checkpoints and the loop."""
