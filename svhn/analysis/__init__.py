"""Looking at results: the score, error-analysis tables, figures, the report, the runs table,
the benchmark.
"""
