"""agkd_models: teacher/student models, distillers and the trainer around agkd_ops.

The models, distillers and trainer arrive with their own issues; the package exists now
so that the distribution layout is final."""
