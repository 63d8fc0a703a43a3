// composecheck loads a compose file the way `docker compose config` does (compose-go: the
// compose specification's schema, interpolation, profiles, an env file) and prints the project
// as JSON, or why the file is invalid (exit 1). paystream's tests check docker-compose.yml with
// it, since no Docker engine or compose plugin runs on every machine.
//
//	composecheck -f docker-compose.yml [-env-file FILE] [-profile NAME]...
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type names []string

func (n *names) String() string     { return strings.Join(*n, ",") }
func (n *names) Set(v string) error { *n = append(*n, v); return nil }

func main() {
	var files, profiles names
	envFile := flag.String("env-file", "", "an env file, as docker compose --env-file")
	flag.Var(&files, "f", "a compose file (repeatable)")
	flag.Var(&profiles, "profile", "a profile to enable (repeatable)")
	flag.Parse()
	options := []cli.ProjectOptionsFn{cli.WithOsEnv}
	if *envFile != "" {
		options = append(options, cli.WithEnvFiles(*envFile))
	}
	options = append(options, cli.WithDotEnv)
	if len(profiles) > 0 {
		options = append(options, cli.WithProfiles(profiles))
	} else {
		options = append(options, cli.WithDefaultProfiles()) // COMPOSE_PROFILES, as compose
	}
	loader, err := cli.NewProjectOptions(files, options...)
	if err != nil {
		fail(err)
	}
	project, err := loader.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
