"""Generated gRPC stubs, one sub-package per proto package (`make proto`); do not edit."""
