"""Federated learning for privtrain: row-stable client partitioners, FedAvg / DP-FedAvg on TFF, simulations.

Public API::

    from federated import simulate, SimulationConfig
    result = simulate(SimulationConfig(clients=100, clients_per_round=10, rounds=20, output_dir="out",
                                       dp_noise_multiplier="auto", privacy={"target_epsilon": 3.0}))
    result.privacy      # the guarantee (Guarantee.to_json()), charged to the source's ledger

TFF is imported lazily (only when rounds run), so importing this package is cheap.
"""
from federated.engine import FederatedConfig, FederatedResult, run_federated
from federated.partition import PartitionSpec, dirichlet, iid, make_shards, shard_summary
from federated.simulate import SimulationConfig, simulate
from federated.strategies import DPFedAvg, FedAvg

__all__ = ["simulate", "SimulationConfig", "FederatedConfig", "FederatedResult", "run_federated", "FedAvg",
           "DPFedAvg", "PartitionSpec", "iid", "dirichlet", "make_shards", "shard_summary"]
