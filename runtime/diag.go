package runtime

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/weftrpc/weft/call"
	"github.com/weftrpc/weft/endpoint"
)

// DiagnosticsPath is where the diagnostics page is served.
const DiagnosticsPath = "/debug/weft"

// Diagnostics describes a running application as the diagnostics page shows it: in HTML for a
// person, or in JSON (with ?format=json or Accept: application/json) for a program. It never
// contains call metadata, payloads or credentials.
type Diagnostics struct {
	Process    string              `json:"process"` // "main", or a replica's "group/index"
	PID        int                 `json:"pid"`
	Mode       string              `json:"mode"` // "single" or "multi"
	Started    time.Time           `json:"started"`
	Healthy    bool                `json:"healthy"`
	Health     string              `json:"health,omitempty"`    // why it is unhealthy
	InFlight   int64               `json:"in_flight,omitempty"` // calls the process is serving (replicas)
	Components []ComponentInfo     `json:"components"`
	Groups     []GroupInfo         `json:"groups,omitempty"`
	Channels   []ChannelDiagnostic `json:"channels,omitempty"`
}

// ComponentInfo is one component as a process sees it.
type ComponentInfo struct {
	Name  string `json:"name"`
	Group string `json:"group,omitempty"`
	Where string `json:"where"` // "local" (created in this process) or "remote"
}

// GroupInfo is a group of a multi-process deployment with its replicas.
type GroupInfo struct {
	Name       string        `json:"name"`
	Components []string      `json:"components"`
	Sharded    bool          `json:"sharded"`
	Replicas   []ReplicaInfo `json:"replicas"`
}

// ReplicaInfo is one replica of a group.
type ReplicaInfo struct {
	Name    string `json:"name"`
	Socket  string `json:"socket"`
	PID     int    `json:"pid,omitempty"`
	State   string `json:"state"` // starting, serving, exited
	Healthy bool   `json:"healthy"`
	Health  string `json:"health,omitempty"` // why it is unhealthy, as it reported
	// InRotation reports whether callers use the replica: it serves and is healthy, or its
	// group is sharded, or no replica of its group is.
	InRotation bool   `json:"in_rotation"`
	Restarts   int    `json:"restarts"`
	LastExit   string `json:"last_exit,omitempty"`
	// Detail is the replica's own view (its in-flight calls, its components, its channels to
	// other groups), asked for when the page is served; DetailError says why it is missing.
	Detail      *Diagnostics `json:"detail,omitempty"`
	DetailError string       `json:"detail_error,omitempty"`
}

// ChannelDiagnostic is this process's Connection to a group: its endpoints' states, calls in
// flight, reported loads and last errors.
type ChannelDiagnostic struct {
	Group     string         `json:"group"`
	Connected bool           `json:"connected"` // false until the first call
	Healthy   bool           `json:"healthy"`
	Endpoints []EndpointInfo `json:"endpoints,omitempty"`
}

// EndpointInfo is one endpoint of a channel.
type EndpointInfo struct {
	Address  string  `json:"address"`
	State    string  `json:"state"`
	Healthy  bool    `json:"healthy"`
	Ejected  bool    `json:"ejected"`
	InFlight int     `json:"in_flight"`
	Load     float64 `json:"load"`
	Error    string  `json:"error,omitempty"`
}

// diag gathers what the diagnostics page shows.
type diag struct {
	started time.Time
	mode    string
	w       *wiring
	d       *deployment // nil but in the main process of a multi-process deployment
	host    *host       // nil but in a process that serves a group
	conns   *groupConns // the process's Connections to other groups, if any
}

var current struct {
	sync.Mutex
	url string
}

// DiagnosticsURL returns the address of the running application's diagnostics page, or "" if
// it serves none (Config.Diagnostics is empty) or is not running.
func DiagnosticsURL() string {
	current.Lock()
	defer current.Unlock()
	return current.url
}

// snapshot describes the process now.
func (g *diag) snapshot() Diagnostics {
	out := Diagnostics{Process: ReplicaName(), PID: os.Getpid(), Mode: g.mode, Started: g.started}
	out.Healthy, out.Health = g.w.health.state()
	groupOf := map[string]string{}
	if g.d != nil {
		g.d.rotMu.Lock()
		rotation := maps.Clone(g.d.rotation)
		g.d.rotMu.Unlock()
		for _, gs := range g.d.groups {
			gi := GroupInfo{Name: gs.Name, Components: gs.Components, Sharded: gs.Sharded}
			for _, c := range gs.Components {
				groupOf[c] = gs.Name
			}
			for _, r := range gs.replicas {
				r.mu.Lock()
				gi.Replicas = append(gi.Replicas, ReplicaInfo{Name: r.name(), Socket: r.sock, PID: r.pid, State: cmp.Or(r.state, "starting"),
					Healthy: r.healthy, Health: r.reason, InRotation: slices.Contains(rotation[gs.Name], r.sock), Restarts: r.restarts, LastExit: r.lastExit})
				r.mu.Unlock()
			}
			out.Groups = append(out.Groups, gi)
		}
		g.replicaDetails(out.Groups)
	}
	if g.host != nil {
		out.InFlight = g.host.inFlight.Load()
	}
	if g.conns != nil {
		out.Channels = g.conns.channels()
	}
	g.w.mu.Lock()
	for iface := range g.w.comps {
		reg, ok := lookupType(iface)
		if !ok {
			continue
		}
		where := "remote"
		if g.w.local[iface] {
			where = "local"
		}
		out.Components = append(out.Components, ComponentInfo{Name: reg.Name, Group: groupOf[reg.Name], Where: where})
	}
	g.w.mu.Unlock()
	slices.SortFunc(out.Components, func(a, b ComponentInfo) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// channelDiagnostic describes the Connection to group, nil if never made.
func channelDiagnostic(group string, gc *groupConn) ChannelDiagnostic {
	ch := ChannelDiagnostic{Group: group}
	if gc == nil {
		return ch
	}
	var st call.ConnectionStatus
	if st, ch.Connected = gc.status(); ch.Connected {
		ch.Healthy = st.Healthy
		for _, e := range st.Endpoints {
			ei := EndpointInfo{Address: e.Address, State: e.State.String(), Healthy: e.Healthy, Ejected: e.Ejected, InFlight: e.InFlight, Load: e.Load}
			if e.Err != nil {
				ei.Error = e.Err.Error()
			}
			ch.Endpoints = append(ch.Endpoints, ei)
		}
	}
	return ch
}

// replicaDetailTimeout bounds how long the page waits for a replica's own diagnostics.
const replicaDetailTimeout = time.Second

// replicaDetails asks every serving replica, at once, for its own diagnostics (over its
// socket, the runtime's diagnostics method) and fills the Detail of groups' replicas.
func (g *diag) replicaDetails(groups []GroupInfo) {
	var wg sync.WaitGroup
	for gi := range groups {
		for ri := range groups[gi].Replicas {
			r := &groups[gi].Replicas[ri]
			if r.State != "serving" {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				d, err := fetchDiagnostics(r.Socket)
				if err != nil {
					r.DetailError = err.Error()
					return
				}
				r.Detail = d
			}()
		}
	}
	wg.Wait()
}

// fetchDiagnostics calls the diagnostics method of the replica serving on sock.
func fetchDiagnostics(sock string) (*Diagnostics, error) {
	ctx, cancel := context.WithTimeout(context.Background(), replicaDetailTimeout)
	defer cancel()
	conn, err := call.Dial(ctx, endpoint.Unix(sock), call.ClientOptions{KeepaliveInterval: -1})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	b, err := conn.Call(ctx, diagnosticsKey, nil, call.CallOptions{})
	if err != nil {
		return nil, err
	}
	var d Diagnostics
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("decoding a replica's diagnostics: %w", err)
	}
	return &d, nil
}

// diagnosticsKey is the method a serving process answers with its diagnostics as JSON.
var diagnosticsKey = call.MakeMethodKey(diagnosticsComponent, "Diagnostics")

// diagnosticsComponent names the runtime's own handlers; it cannot be a component's name
// (those are package paths followed by a slash).
const diagnosticsComponent = "weft.runtime"

// ServeHTTP serves the diagnostics page.
func (g *diag) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	snap := g.snapshot()
	if r.URL.Query().Get("format") == "json" || strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(snap)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := pageTemplate.Execute(w, snap); err != nil {
		http.Error(w, "rendering the page failed", http.StatusInternalServerError)
	}
}

// serveHealth answers 200 and "healthy" when the process is healthy, and 503 with the reason
// when it is not, for load balancers and orchestrators' probes.
func (g *diag) serveHealth(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if ok, reason := g.w.health.state(); !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "unhealthy: %s\n", reason)
		return
	}
	fmt.Fprintln(w, "healthy")
}

var pageTemplate = template.Must(template.New("weft").Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>weft: {{.Process}}</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#eee}</style></head>
<body><h1>weft: {{.Process}}</h1>
<p>pid {{.PID}}, {{.Mode}}-process mode, started {{.Started.Format "2006-01-02 15:04:05 MST"}},
{{if .Healthy}}healthy{{else}}<b>unhealthy</b>: {{.Health}}{{end}}.
<a href="?format=json">JSON</a>, <a href="` + DiagnosticsPath + `/channels">every channel of this process</a>, <a href="` + DiagnosticsPath + `/health">health</a></p>
<h2>Components</h2>
<table><tr><th>component</th><th>group</th><th>where</th></tr>
{{range .Components}}<tr><td>{{.Name}}</td><td>{{.Group}}</td><td>{{.Where}}</td></tr>
{{end}}</table>
{{if .Groups}}<h2>Groups and replicas</h2>
<table><tr><th>replica</th><th>state</th><th>health</th><th>in rotation</th><th>serving</th><th>its channels</th><th>pid</th><th>restarts</th><th>last exit</th><th>socket</th></tr>
{{range .Groups}}{{range .Replicas}}<tr><td>{{.Name}}</td><td>{{.State}}</td><td>{{if .Healthy}}healthy{{else}}unhealthy: {{.Health}}{{end}}</td><td>{{.InRotation}}</td>
<td>{{with .Detail}}{{.InFlight}} calls{{else}}{{.DetailError}}{{end}}</td><td>{{with .Detail}}{{range .Channels}}{{.Group}}: {{if .Connected}}{{if .Healthy}}healthy{{else}}unhealthy{{end}}, {{len .Endpoints}} endpoints{{else}}not connected{{end}}<br>{{end}}{{end}}</td>
<td>{{.PID}}</td><td>{{.Restarts}}</td><td>{{.LastExit}}</td><td>{{.Socket}}</td></tr>
{{end}}{{end}}</table>{{end}}
{{if .Channels}}<h2>Channels</h2>
<table><tr><th>group</th><th>endpoint</th><th>state</th><th>healthy</th><th>ejected</th><th>in flight</th><th>load</th><th>error</th></tr>
{{range .Channels}}{{$g := .Group}}{{if .Connected}}{{range .Endpoints}}<tr><td>{{$g}}</td><td>{{.Address}}</td><td>{{.State}}</td><td>{{.Healthy}}</td><td>{{.Ejected}}</td><td>{{.InFlight}}</td><td>{{.Load}}</td><td>{{.Error}}</td></tr>
{{end}}{{else}}<tr><td>{{$g}}</td><td colspan="7">not connected yet</td></tr>
{{end}}{{end}}</table>{{end}}
</body></html>
`))

// serveDiagnostics serves the diagnostics page on addr until ctx is done, and returns its URL.
func serveDiagnostics(ctx context.Context, addr string, g *diag, wg *sync.WaitGroup) (string, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("runtime: diagnostics page: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle(DiagnosticsPath, g)
	mux.Handle(DiagnosticsPath+"/channels", call.ChannelsHandler())
	mux.HandleFunc(DiagnosticsPath+"/health", g.serveHealth)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	url := "http://" + l.Addr().String() + DiagnosticsPath
	current.Lock()
	current.url = url
	current.Unlock()
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.w.cfg.Logger.Warn("weft: diagnostics page stopped", "err", err)
		}
	}()
	go func() {
		defer wg.Done()
		<-ctx.Done()
		current.Lock()
		current.url = ""
		current.Unlock()
		shut, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(shut)
	}()
	return url, nil
}
