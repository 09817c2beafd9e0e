"""`kvpolicy eval`: what a policy costs in quality, at equal physical KV memory.

tasks.py     generated tasks (passkey, needle, multikey, vartrack, qa, text)
metrics.py   KL vs full, top-1, perplexity, answer log-likelihood, accuracy
memory.py    a memory fraction -> each policy's params (fixed or measured search)
runner.py    validation, the loop over samples, policies and fractions
results.py   the results JSON (atomic rewrites, --resume)
report.py    the table and the plot
command.py   the argparse subcommand
"""
