"""Training: mesh and sharding rules, data, loss, optimizer step and trainer."""
