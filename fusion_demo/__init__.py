"""The embedded demo and the sample data it uses (Harvard image pairs, a generated CT+MR phantom pair); not part of the service."""
