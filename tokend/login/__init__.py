"""`tokend login`: discovery, client identity and the authorization flows (device, loopback,
paste-back). Loaded only by the `login` command: it needs httpx."""
