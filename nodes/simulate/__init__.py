"""A federation on one machine: broker, server and sites as processes (`fedstream simulate`)."""
