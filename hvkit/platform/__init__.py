"""The KVM side of device models: routes, eventfds and threads that connect
a KVM-free device (hvkit.devices) to a running VM."""
