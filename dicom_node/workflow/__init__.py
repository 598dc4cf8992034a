"""From received series to fused objects: when a series is complete, which two make a job, the job queue, the pipeline's typed stages, and the node that runs it all."""
