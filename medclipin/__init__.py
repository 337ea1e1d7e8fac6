"""medclipin."""
