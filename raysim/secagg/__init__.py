"""Secure aggregation (Bonawitz et al., CCS 2017; SecAgg+, Bell et al., CCS 2020): fixed-point
encoding, Shamir secret sharing and pairwise masking. Plain functions, no Ray."""
