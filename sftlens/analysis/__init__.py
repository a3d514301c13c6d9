"""Token- and parameter-level analyses of a fine-tuned model against its base (paper Sections 4-5).

`kl`: first-token KL divergence; `deltas`: how concentrated the update is, on the exact streamed
selection of `sftlens.weights.selection` (the one restoration and TIES' trim use).
"""
