"""The dialog wing (Table 2): the CVAE, SwDA, its batcher, its metrics, sampled responses and
the dialog test."""
