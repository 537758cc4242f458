"""Moved to `serve.ood_client` (numpy only, shared by the client and the server); kept as an alias."""

from serve.ood_client import LOGIT_DETECTORS, check_ood_manifest, logit_scores, ood_from_logits

__all__ = ["LOGIT_DETECTORS", "check_ood_manifest", "logit_scores", "ood_from_logits"]
