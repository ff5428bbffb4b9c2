"""Differential privacy: accounting (over Opacus' accountants), local DP-SGD and central DP-FedAvg.

Plain functions and small classes without Ray; the runtime calls them on workers and the driver.
"""
