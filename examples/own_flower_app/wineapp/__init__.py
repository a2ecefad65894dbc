"""A user's Flower app around fedtrak: their task, fedtrak's apps."""
