"""The measurement room: how models are measured and compared (paired statistics for now; the
bench, padding-free batches, the compile helper and the stage report will move here later)."""
