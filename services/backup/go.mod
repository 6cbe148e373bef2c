module github.com/qubesbus/qubesbus/services/backup

go 1.26.0

require (
	github.com/qubesbus/qubesbus/schemas v0.0.0
	golang.org/x/crypto v0.58.0
	gopkg.in/yaml.v3 v3.0.1
)

replace (
	github.com/qubesbus/qubesbus/bus => ../../bus
	github.com/qubesbus/qubesbus/schemas => ../../schemas
)
