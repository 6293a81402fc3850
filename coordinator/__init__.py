"""edgefm coordinator: federated rounds over MQTT, LoRA-aware aggregation (no torch)."""
