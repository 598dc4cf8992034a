"""What the node holds: instance files on disk, the SQLite index of patients/studies/series/instances, and query matching against it."""
