"""A fleet of device servers without MLflow: the fleet file (`inventory.py`), a device and its address
(`device.py`), how to reach one (`connection.py`). The deployments plugin and the remote runtime both read them."""
