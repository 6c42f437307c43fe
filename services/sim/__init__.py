"""The cluster simulator (docs/simulator.md): the project's own router, scheduler, block manager
and coordinator policy in simulated time, with a time model measured on this machine."""
