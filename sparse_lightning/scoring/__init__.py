"""Scoring in bounded memory, shared by the data-driven selections (SIFT, SIFT global, S2FT by gradient): groups of
weights whose summed scores fit a budget (`score_groups`) and sums cut by rows over ranks (`row_sharded_sums`)."""
