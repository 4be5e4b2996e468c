"""Federated learning for privtrain: client partitioners, FedAvg / DP-FedAvg on TFF, simulations.

Public API::

    from federated import simulate, SimulationConfig
    result = simulate(SimulationConfig(clients=100, clients_per_round=10, rounds=20, output_dir="out"))

TFF is imported lazily (only when rounds run), so importing this package is cheap.
"""
from federated.engine import FederatedConfig, FederatedResult, run_federated
from federated.partition import PartitionSpec, by_column, dirichlet, iid, make_shards, shard_summary
from federated.simulate import SimulationConfig, simulate
from federated.strategies import DPFedAvg, FedAvg

__all__ = ["simulate", "SimulationConfig", "FederatedConfig", "FederatedResult", "run_federated", "FedAvg",
           "DPFedAvg", "PartitionSpec", "iid", "dirichlet", "by_column", "make_shards", "shard_summary"]
