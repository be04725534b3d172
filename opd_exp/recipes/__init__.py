"""The recipes layer: schedules and data recipes built from engines and methods (off-policy cold
start, teacher-aligned prompt selection — SPEC §2). The loop calls them."""
