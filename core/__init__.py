"""The ground floor of tessera: the store (one folder on any fsspec filesystem, with its retry
policy), leases and fences, the Ray runner and stage engine, summaries and errors, dataset
versions (which rows are live), and the config base. Nothing here knows a stage."""
