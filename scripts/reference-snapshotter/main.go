// Command containerd-stargz-grpc serves the Go reference stargz snapshotter
// (the library Debian ships in golang-github-containerd-stargz-snapshotter-dev)
// as a containerd proxy snapshotter on a unix socket, so benches can compare
// rstargz with it.
//
// Debian packages the library but not this command: the library's `service`
// and `service/resolver` packages import k8s.io/cri-api, which bookworm does
// not have. So this entry point wires the packages below them itself (fs,
// fs/source, snapshot) with a registry resolver of its own that has no CRI
// keychain. scripts/reference-snapshotter.sh builds it.
//
// Every path comes from a flag: nothing defaults to a system location.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

// Config is the file layout: the filesystem's own settings at the top level
// and registry mirrors under [resolver.host."NAME"].
type Config struct {
	fsconfig.Config
	Resolver ResolverConfig `toml:"resolver"`
}

type ResolverConfig struct {
	Host map[string]HostConfig `toml:"host"`
}

type HostConfig struct {
	Mirrors []Mirror `toml:"mirrors"`
}

// Mirror is one registry endpoint tried before the image's own host.
type Mirror struct {
	Host string `toml:"host"`
	// Insecure selects plain HTTP (loopback hosts always use it).
	Insecure          bool `toml:"insecure"`
	RequestTimeoutSec int  `toml:"request_timeout_sec"`
}

func main() {
	address := flag.String("address", "", "unix socket to serve the snapshots API on (required)")
	root := flag.String("root", "", "state directory: snapshots, FUSE mounts and caches (required)")
	configPath := flag.String("config", "", "TOML config; optional")
	logLevel := flag.String("log-level", "info", "logrus level")
	flag.Parse()
	if err := run(*address, *root, *configPath, *logLevel); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(address, root, configPath, logLevel string) error {
	if address == "" || root == "" {
		return fmt.Errorf("-address and -root are required")
	}
	level, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	logrus.SetLevel(level)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(logrus.StandardLogger()))

	var config Config
	if configPath != "" {
		tree, err := toml.LoadFile(configPath)
		if err != nil {
			return fmt.Errorf("loading %s: %w", configPath, err)
		}
		if err := tree.Unmarshal(&config); err != nil {
			return fmt.Errorf("decoding %s: %w", configPath, err)
		}
	}
	log.G(ctx).Debugf("config: %+v", config)

	snRoot := filepath.Join(root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		return err
	}
	if err := overlayutils.Supported(snRoot); err != nil {
		return fmt.Errorf("overlayfs not usable under %s: %w", snRoot, err)
	}
	opaque := layer.OverlayOpaqueTrusted
	if user, _ := overlayutils.NeedsUserXAttr(snRoot); user {
		opaque = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(root, "stargz"), config.Config,
		stargzfs.WithGetSources(source.FromDefaultLabels(registryHosts(config.Resolver))),
		stargzfs.WithOverlayOpaqueType(opaque))
	if err != nil {
		return fmt.Errorf("configuring the filesystem: %w", err)
	}
	sn, err := snapshot.NewSnapshotter(ctx, snRoot, fs, snapshot.AsynchronousRemove)
	if err != nil {
		return fmt.Errorf("starting the snapshotter: %w", err)
	}

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil {
		return err
	}
	listener, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", address, err)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))

	// On SIGINT/SIGTERM stop serving, then Close unmounts every FUSE layer
	// so the caller can delete the root afterwards.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	select {
	case <-signals:
		server.Stop()
	case err = <-served:
	}
	if cerr := sn.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// registryHosts lists the configured mirrors of the image's host, then the
// host itself; requests retry with back-off (go-retryablehttp's defaults).
func registryHosts(cfg ResolverConfig) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		name := ref.Hostname()
		var hosts []docker.RegistryHost
		for _, m := range append(cfg.Host[name].Mirrors, Mirror{Host: name}) {
			retrying := rhttp.NewClient()
			retrying.Logger = nil
			client := retrying.StandardClient()
			switch {
			case m.RequestTimeoutSec == 0:
				client.Timeout = 30 * time.Second
			case m.RequestTimeoutSec > 0:
				client.Timeout = time.Duration(m.RequestTimeoutSec) * time.Second
			}
			scheme := "https"
			if local, _ := docker.MatchLocalhost(m.Host); local || m.Insecure {
				scheme = "http"
			}
			hosts = append(hosts, docker.RegistryHost{
				Client:       client,
				Host:         m.Host,
				Scheme:       scheme,
				Path:         "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
				Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
			})
		}
		return hosts, nil
	}
}
