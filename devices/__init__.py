"""edgefm devices: hardware profiles and the fleet simulator."""
