"""The Triton backend: kernels generated per policy from fixed templates
(docs/triton.md). Without CUDA they run in Triton's interpreter, chosen in
kvpolicy.backends before triton is first imported."""
