"""Which implementation runs a layer at each batch size: tuned tables and the default policy."""
