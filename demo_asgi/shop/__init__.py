"""The demo app: products, orders, and the views that reach them through the bridge."""
