"""Token- and parameter-level analyses of a fine-tuned model against its base (paper Sections 4-5).

`kl`: first-token KL divergence; `deltas`: streamed update statistics and the exact global
selection shared with `sftlens.restore`.
"""
