"""Pure planning: model and device specs in, sizes and plans out. Imports nothing else of ours."""
