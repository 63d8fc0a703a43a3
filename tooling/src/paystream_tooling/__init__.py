"""paystream's tooling, apart from its runtime: the development environment (Kafka, PostgreSQL,
Toxiproxy and network namespaces started locally), the simulator of the retailer's third party,
`paystream demo`, `paystream bench` and the acceptance oracle (reconcile) that both and the tests
use. The processor never imports this package; it imports what it measures or drives. Installed,
it adds its commands to the `paystream` CLI (the `paystream.commands` entry point)."""
