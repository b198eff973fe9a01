// Command verify opens an eStargz blob with the reference Go library
// (github.com/containerd/stargz-snapshotter/estargz), checks its TOC digest,
// verifies every chunk of every regular file through the library's
// verifiers, and prints the entries it saw as JSON on stdout.
//
// Usage: verify [-entries-only] BLOB TOC_DIGEST
//
//	verify -build [-chunk-size N] [-prioritized a,b] TAR OUT
//
// The -build form converts TAR with the library's own estargz.Build instead,
// so tests can compare the two writers' TOCs; it prints the TOC digest and
// DiffID as JSON.
//
// -entries-only skips chunk verification; it exists because the Debian
// library (v0.12) predates innerOffset and cannot read chunks that share a
// gzip member.
package main

import (
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

type seen struct {
	Name     string `json:"name"`
	Type     string `json:"type"`
	Size     int64  `json:"size"`
	Mode     int64  `json:"mode"`
	LinkName string `json:"linkName,omitempty"`
	Digest   string `json:"digest,omitempty"`
	// Content is the sha256 of the bytes read through the library.
	Content string `json:"content,omitempty"`
	Chunks  int    `json:"chunks"`
}

type report struct {
	TOCDigest string `json:"tocDigest"`
	Entries   []seen `json:"entries"`
}

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "verify: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	entriesOnly := flag.Bool("entries-only", false, "do not read or verify chunks")
	doBuild := flag.Bool("build", false, "build TAR into OUT with estargz.Build")
	chunkSize := flag.Int("chunk-size", 0, "chunk size for -build (0: default)")
	prioritized := flag.String("prioritized", "", "comma-separated prioritized files for -build")
	flag.Parse()
	if *doBuild {
		build(*chunkSize, *prioritized)
		return
	}
	if flag.NArg() != 2 {
		fail("usage: verify [-entries-only] BLOB TOC_DIGEST")
	}
	f, err := os.Open(flag.Arg(0))
	if err != nil {
		fail("%v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		fail("%v", err)
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		fail("open: %v", err)
	}
	want, err := digest.Parse(flag.Arg(1))
	if err != nil {
		fail("bad digest: %v", err)
	}
	if r.TOCDigest() != want {
		fail("TOC digest %s, want %s", r.TOCDigest(), want)
	}
	var v estargz.TOCEntryVerifier
	if !*entriesOnly {
		if v, err = r.VerifyTOC(want); err != nil {
			fail("VerifyTOC: %v", err)
		}
	}
	root, ok := r.Lookup("")
	if !ok {
		fail("no root")
	}
	var out report
	out.TOCDigest = r.TOCDigest().String()
	walk(r, v, root, "", &out)
	sort.Slice(out.Entries, func(i, j int) bool { return out.Entries[i].Name < out.Entries[j].Name })
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(out); err != nil {
		fail("%v", err)
	}
}

func walk(r *estargz.Reader, v estargz.TOCEntryVerifier, dir *estargz.TOCEntry, prefix string, out *report) {
	dir.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
		name := prefix + base
		s := seen{Name: name, Type: e.Type, Size: e.Size, Mode: e.Mode, LinkName: e.LinkName, Digest: e.Digest}
		if e.Type == "reg" && v != nil {
			s.Content, s.Chunks = readVerified(r, v, name, e)
		}
		out.Entries = append(out.Entries, s)
		if e.Type == "dir" {
			walk(r, v, e, name+"/", out)
		}
		return true
	})
}

// readVerified reads the file chunk by chunk, checks each chunk against its
// verifier, and returns the sha256 of the whole content.
func readVerified(r *estargz.Reader, v estargz.TOCEntryVerifier, name string, e *estargz.TOCEntry) (string, int) {
	sr, err := r.OpenFile(name)
	if err != nil {
		fail("open %s: %v", name, err)
	}
	whole := sha256.New()
	chunks := 0
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			fail("%s: no chunk at %d", name, off)
		}
		buf := make([]byte, ce.ChunkSize)
		if _, err := sr.ReadAt(buf, ce.ChunkOffset); err != nil && err != io.EOF {
			fail("%s: read at %d: %v", name, ce.ChunkOffset, err)
		}
		ver, err := v.Verifier(ce)
		if err != nil {
			fail("%s: verifier: %v", name, err)
		}
		if _, err := ver.Write(buf); err != nil {
			fail("%v", err)
		}
		if !ver.Verified() {
			fail("%s: chunk at %d does not match its chunkDigest", name, ce.ChunkOffset)
		}
		whole.Write(buf)
		chunks++
		off = ce.ChunkOffset + ce.ChunkSize
	}
	got := fmt.Sprintf("sha256:%x", whole.Sum(nil))
	if e.Digest != "" && !strings.EqualFold(got, e.Digest) {
		fail("%s: content %s, TOC digest %s", name, got, e.Digest)
	}
	return got, chunks
}

func build(chunkSize int, prioritized string) {
	if flag.NArg() != 2 {
		fail("usage: verify -build TAR OUT")
	}
	in, err := os.Open(flag.Arg(0))
	if err != nil {
		fail("%v", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		fail("%v", err)
	}
	opts := []estargz.Option{estargz.WithCompressionLevel(9)}
	if chunkSize > 0 {
		opts = append(opts, estargz.WithChunkSize(chunkSize))
	}
	if prioritized != "" {
		opts = append(opts, estargz.WithPrioritizedFiles(strings.Split(prioritized, ",")))
	}
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		fail("build: %v", err)
	}
	defer blob.Close()
	out, err := os.Create(flag.Arg(1))
	if err != nil {
		fail("%v", err)
	}
	if _, err := io.Copy(out, blob); err != nil {
		fail("write: %v", err)
	}
	if err := out.Close(); err != nil {
		fail("%v", err)
	}
	res := map[string]string{"tocDigest": blob.TOCDigest().String(), "diffID": blob.DiffID().String()}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fail("%v", err)
	}
}
