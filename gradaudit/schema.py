"""Names of the stored per-pair data that several floors share (the ground floor: imports nothing).

The capture writes these fields, the run folder stores them, and the audit reads them, so none of those
rooms needs to import another for a name.
"""

# The per-text-token quantities the capture's forward pass records for the logit baselines, in this order.
TOKEN_FIELDS = ("label_logp", "mean_logp", "std_logp", "renyi_0.5", "renyi_1", "renyi_2", "renyi_inf", "top_gap")

# The slice statistics of one weight, per pair: row_sq, row_dot (n, d_out); col_sq, col_dot (n, d_in).
STAT_KEYS = ("row_sq", "col_sq", "row_dot", "col_dot")
