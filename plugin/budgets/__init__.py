"""KV budgets: per-head rank tables, the greedy KL rank search, and the ranks x bits allocator."""
