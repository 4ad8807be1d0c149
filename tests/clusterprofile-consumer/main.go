// clusterprofile-consumer: a ClusterProfile consumer as multicluster-runtime, Kueue or Knative build one,
// with nothing of Keyless in it. It reads one ClusterProfile from the inventory (control-plane) cluster,
// turns it into a client-go rest.Config with SIG Multicluster's pkg/access and a provider file (the
// --clusterprofile-provider-file every such consumer takes), and asks the cluster who it is
// (SelfSubjectReview). It prints what it saw as JSON, never a credential.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/cluster-inventory-api/apis/v1alpha1"
	"sigs.k8s.io/cluster-inventory-api/pkg/access"
)

type result struct {
	Profile  string   `json:"profile"`
	Server   string   `json:"server"`
	Username string   `json:"username,omitempty"`
	Groups   []string `json:"groups,omitempty"`
	Error    string   `json:"error,omitempty"`
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster that holds the ClusterProfiles")
	namespace := flag.String("namespace", "", "namespace of the ClusterProfile")
	name := flag.String("name", "", "name of the ClusterProfile")
	providerFile := access.SetupProviderFileFlag()
	flag.Parse()
	out := result{Profile: *namespace + "/" + *name}
	err := run(*kubeconfig, *namespace, *name, *providerFile, &out)
	if err != nil {
		out.Error = err.Error()
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
	if err != nil {
		os.Exit(1)
	}
}

func run(kubeconfig, namespace, name, providerFile string, out *result) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	inventory, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("inventory kubeconfig: %w", err)
	}
	client, err := dynamic.NewForConfig(inventory)
	if err != nil {
		return err
	}
	raw, err := client.Resource(v1alpha1.GroupVersion.WithResource("clusterprofiles")).Namespace(namespace).
		Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("read ClusterProfile: %w", err)
	}
	var profile v1alpha1.ClusterProfile
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(raw.Object, &profile); err != nil {
		return fmt.Errorf("decode ClusterProfile: %w", err)
	}
	providers, err := access.NewFromFile(providerFile)
	if err != nil {
		return err
	}
	config, err := providers.BuildConfigFromCP(&profile)
	if err != nil {
		return err
	}
	out.Server = config.Host
	clientset, err := kubernetes.NewForConfig(config)
	if err != nil {
		return err
	}
	review, err := clientset.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("SelfSubjectReview on %s: %w", config.Host, err)
	}
	out.Username = review.Status.UserInfo.Username
	out.Groups = review.Status.UserInfo.Groups
	return nil
}
