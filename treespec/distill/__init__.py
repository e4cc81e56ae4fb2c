"""`treespec distill`: learned drafters trained on the target's own generations (data, net, train, cli)."""
