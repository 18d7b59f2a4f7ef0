"""Development fixtures: the offline tiny Qwen2.5-VL, the generator zoo and the SID_Set-format demo
data. Production modules never import this package (tests/test_layout.py pins it); only the CLI's
dev commands, the tests, bench/ and `model.build_tiny` (lazily) do."""
