"""Host glue: where files live, the service unit, sd_notify, logging, heap trimming."""
