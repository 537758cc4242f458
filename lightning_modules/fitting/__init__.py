"""The math of a fit, torch-light and LightningModule-free: sufficient statistics, the closed-form solvers and
their λ criteria, the subspace solver, logistic regression, standardisation and paired statistics."""
