"""DICOM on the wire: who may associate, TLS, the listener with its Storage and Query/Retrieve services, and the SCU plumbing every sender shares."""
